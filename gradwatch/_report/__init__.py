"""Post-hoc reports: verdicts per layer, the HTML/Markdown report, the demo."""
