"""kvant.formats"""
