"""weft.hw."""
