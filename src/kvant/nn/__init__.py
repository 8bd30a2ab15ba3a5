"""kvant.nn"""
