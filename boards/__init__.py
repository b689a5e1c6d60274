"""weft.boards."""
