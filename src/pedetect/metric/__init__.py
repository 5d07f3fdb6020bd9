"""The competition metric and label-consistency rules, written once (DESIGN.md §5)."""
