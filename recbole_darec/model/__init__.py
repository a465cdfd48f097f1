"""Models of recbole-darec (one model per file) and their parts."""
