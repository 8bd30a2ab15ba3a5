"""kvant.calib"""
