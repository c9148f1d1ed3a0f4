"""What researchers and operators read, computed from the database alone: metrics, exports
(finalize), status, the HTML report and comparisons of experiments."""
