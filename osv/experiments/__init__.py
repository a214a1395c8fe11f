"""Small experiments on exact ground truth (`osv experiment ...`)."""
