"""Reading Aff-Wild2-shaped data and generating a synthetic tree in the same layout."""
