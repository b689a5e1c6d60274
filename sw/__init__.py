"""weft.sw."""
