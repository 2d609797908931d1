"""PostgreSQL: tables, engines and sessions, migrations, collections, images, prototypes, history."""
