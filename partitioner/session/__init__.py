"""Sessions: the owner's decode loop (``owner``), the terminal tier's bookkeeping (``terminal``) and the split
model chained in one process (``local``)."""
