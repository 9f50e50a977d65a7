"""What goes in: image folders, ratings tables, stimulus sets and the embedded default."""
