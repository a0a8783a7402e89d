"""What the app adds to MONAI Label's HTTP server (installed by apps/sdfsmis/main.py, server process only)."""
