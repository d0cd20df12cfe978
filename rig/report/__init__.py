"""Reports people look at: step-trace timelines (HTML/SVG), the session report, provenance."""
