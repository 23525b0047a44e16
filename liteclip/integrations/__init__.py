"""liteclip models inside other tools' harnesses (each module imports its tool only when used)."""
