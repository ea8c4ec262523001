"""Users in a database: models, migrations, the store the CLI uses and aioftp's user manager."""
