"""The six pipeline steps (one module each) and what they share; see README "The six steps"."""
