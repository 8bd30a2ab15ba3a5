"""The one fix the kernels with run-time loop bounds need to run under Triton 3.6's interpreter: it takes ``int()``
of one-element arrays, which numpy >= 2.4 refuses for a loop bound. Interpreter scripts
start with :data:`PATCH` (the kernels themselves are unchanged)."""

PATCH = r"""
import triton.runtime.interpreter as ti
_orig = ti._patch_lang_tensor
def _patched(tensor, scope):
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
ti._patch_lang_tensor = _patched
"""


def run_cases(script: str, cases: list, src) -> list:
    """Run ``script`` (which reads ``CASES`` and prints one JSON line last) in a fresh Python
    under ``TRITON_INTERPRET=1`` with ``src`` on its path; returns that JSON."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(src))
    r = subprocess.run([sys.executable, "-c", f"CASES = {cases!r}\n" + script],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
