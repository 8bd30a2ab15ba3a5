"""kvant.core"""
