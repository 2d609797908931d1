"""Tests of the service: searching, serving, keeping collections consistent."""
