"""Request inputs: the one processor that turns prompts and parameters into engine requests."""
