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
