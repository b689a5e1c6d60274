"""weft.compiler."""
