"""The data layer: file readers, preprocessing and its cache, the cold-start split and tasks, the generator."""
