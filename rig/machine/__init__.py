"""Machine model: vCPUs, x86 paging and CR3, kernel symbols, instruction text."""
