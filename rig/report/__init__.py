"""Reports people look at: a step trace as an HTML/SVG timeline (``timeline``), the
session report ``results/index.html`` (``session``), what exactly ran (``provenance``,
also as JUnit properties), and the plugin's calls into them (``hooks``)."""
