"""kvant.model"""
