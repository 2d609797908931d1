"""Tests of the REST API, its guard and the page."""
