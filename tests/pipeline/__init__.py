"""Tests of the batch stages."""
