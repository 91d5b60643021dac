"""Training: the loop, its precision, the recipe, tracked runs, resume states, several processes, transfer
learning and cached backbone features."""
