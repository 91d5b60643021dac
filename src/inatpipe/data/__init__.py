"""Data: the one image decoder, the dirty-data scan and index files, the stratified split, the prepared arrays
(decode once), channel statistics, batch transforms and loaders; getting a dataset into data/."""
