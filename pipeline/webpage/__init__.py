"""The self-contained HTML report: inline SVG charts, inlined thumbnails, one template."""
