"""kvant.compat"""
