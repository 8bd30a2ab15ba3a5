"""kvant.algorithms"""
