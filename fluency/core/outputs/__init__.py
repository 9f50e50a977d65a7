"""What comes out: the terminal summary, figures and the HTML report."""
