"""What the API and the command line call: collections served, searched and kept consistent."""
