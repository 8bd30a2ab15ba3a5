"""kvant.kernels"""
