"""A probe Flower App (Bastion's launcher tests)."""
