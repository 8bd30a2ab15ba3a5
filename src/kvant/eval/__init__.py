"""kvant.eval"""
