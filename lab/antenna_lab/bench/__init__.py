"""The bench: scenarios run end to end on the real stack, side by side with the upstream drain pattern."""
