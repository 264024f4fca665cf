from .anova import AnovaComponents, anova_components
