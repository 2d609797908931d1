"""The REST API: the app, its dependencies, the request guard, telemetry, schemas and routes."""
