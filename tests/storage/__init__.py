"""Tests of PostgreSQL: engine, embedded server, bulk reads, prototypes, outages."""
