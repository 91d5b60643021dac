"""Data layer: folder scanning and index files, the stratified split, channel statistics, datasets and loaders."""
