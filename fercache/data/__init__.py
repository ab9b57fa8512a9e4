"""Reading Aff-Wild2-shaped data: the tree (annotations, image folders, splits), frame lists, the
label numberings of other expression data sets, and `fercache inspect`'s summary of a tree."""
