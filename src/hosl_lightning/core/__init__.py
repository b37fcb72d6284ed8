"""The algorithm's core: the cut, the split model, the zeroth-order engine and the boundary between halves."""
