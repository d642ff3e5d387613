"""One run: load the model and data, apply the method, train, evaluate, diagnose, write the record."""
