"""weft.sim."""
