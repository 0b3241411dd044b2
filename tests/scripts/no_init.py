"""A script someone forgot to convert: it never calls flkit.init()."""
print("training locally only")
