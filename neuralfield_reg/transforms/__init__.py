"""Transforms between images: world/unit/local forms of affine maps, the starting point of a
fit (:mod:`.world`), and ITK/ANTs files (:mod:`.itk`)."""
