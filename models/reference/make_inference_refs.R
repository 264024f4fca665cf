# Reference values for stochmm.inference (issue 11): lmerTest 3.1-3 Satterthwaite / Kenward-Roger
# tables and F tests, pbkrtest 0.5.2 vcovAdj, lme4 1.1-31 profile intervals, hat values, Cook's
# distance and rePCA. Run from the repository root:
#   Rscript models/reference/make_inference_refs.R
# Writes tests/reference/inference_refs.json.
suppressMessages({library(lme4); library(lmerTest); library(pbkrtest); library(jsonlite)})
options(digits = 15)
ss <- lme4::sleepstudy
# deterministic between-subject factor and unbalanced subset (defined identically in the tests)
lev <- levels(ss$Subject)
ss$G <- factor(c("a", "b", "c")[(match(as.character(ss$Subject), lev) - 1) %% 3 + 1])
ss_unb <- ss[(seq_len(nrow(ss)) %% 7) != 0, ]
data(cake, package = "lme4")
cake$recipe <- factor(cake$recipe); cake$replicate <- factor(cake$replicate)

models <- list(
  sleep_slopes = list(f = Reaction ~ Days + (Days | Subject), d = "ss"),
  sleep_unbalanced = list(f = Reaction ~ Days + (Days | Subject), d = "ss_unb"),
  sleep_factor = list(f = Reaction ~ Days * G + (Days | Subject), d = "ss"),
  penicillin = list(f = diameter ~ 1 + (1 | plate) + (1 | sample), d = "Penicillin"),
  pastes = list(f = strength ~ 1 + (1 | batch/cask), d = "Pastes"),
  cake = list(f = angle ~ recipe * temperature + (1 | recipe:replicate), d = "cake")
)
datas <- list(ss = ss, ss_unb = ss_unb, Penicillin = lme4::Penicillin, Pastes = lme4::Pastes, cake = cake)

tab <- function(ct) lapply(setNames(seq_len(nrow(ct)), rownames(ct)), function(i)
  list(estimate = ct[i, "Estimate"], se = ct[i, "Std. Error"], df = ct[i, "df"], t = ct[i, "t value"],
       p = ct[i, "Pr(>|t|)"]))
aov <- function(a) lapply(setNames(seq_len(nrow(a)), rownames(a)), function(i)
  list(NumDF = a[i, "NumDF"], DenDF = a[i, "DenDF"], F = a[i, "F value"], p = a[i, "Pr(>F)"]))

out <- list()
for (nm in names(models)) {
  m <- models[[nm]]
  fit <- lmerTest::lmer(m$f, data = datas[[m$d]], REML = TRUE)
  e <- list(formula = deparse(m$f), data = m$d, REML = TRUE,
            theta = unname(getME(fit, "theta")), sigma = sigma(fit), fixef = as.list(fixef(fit)),
            satterthwaite = tab(coef(summary(fit, ddf = "Satterthwaite"))),
            kenward_roger = tab(coef(summary(fit, ddf = "Kenward-Roger"))),
            vcov_kr = unname(as.matrix(pbkrtest::vcovAdj(fit))))
  if (length(fixef(fit)) > 1) {
    e$anova_satterthwaite_type3 <- aov(anova(fit, type = 3, ddf = "Satterthwaite"))
    e$anova_satterthwaite_type1 <- aov(anova(fit, type = 1, ddf = "Satterthwaite"))
    e$anova_kr_type3 <- aov(anova(fit, type = 3, ddf = "Kenward-Roger"))
    e$anova_kr_type1 <- aov(anova(fit, type = 1, ddf = "Kenward-Roger"))
  }
  out[[nm]] <- e
}

# profile intervals (lme4; oldNames: .sig01, ..., .sigma, then fixed effects)
prof <- list(
  sleep_slopes_REML = lme4::lmer(Reaction ~ Days + (Days | Subject), ss, REML = TRUE),
  penicillin_REML = lme4::lmer(diameter ~ 1 + (1 | plate) + (1 | sample), lme4::Penicillin, REML = TRUE),
  dyestuff_ML = lme4::lmer(Yield ~ 1 + (1 | Batch), lme4::Dyestuff, REML = FALSE),
  dyestuff2_ML = lme4::lmer(Yield ~ 1 + (1 | Batch), lme4::Dyestuff2, REML = FALSE)
)
out$profile <- lapply(prof, function(fit) {
  t0 <- proc.time()[["elapsed"]]
  ci <- suppressWarnings(confint(fit, method = "profile", level = 0.95))
  list(elapsed_s = proc.time()[["elapsed"]] - t0, names = rownames(ci),
       lower = unname(ci[, 1]), upper = unname(ci[, 2]))
})

# GLMM profiles with the fit's nAGQ: lme4 1.1-31 profiles an nAGQ > 1 fit on its AGQ deviance (getME(fit,
# "devfun") keeps the fit's nAGQ); it cannot profile an nAGQ = 0 fit (its devfun takes theta alone and
# profile.merMod passes (theta, beta)): the error message is recorded.
cbpp <- lme4::cbpp
glmm_prof <- list(
  cbpp_agq25 = glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, nAGQ = 25),
  cbpp_poisson_agq9 = glmer(incidence ~ period + offset(log(size)) + (1 | herd), cbpp, poisson, nAGQ = 9)
)
for (nm in names(glmm_prof)) {
  fit <- glmm_prof[[nm]]
  t0 <- proc.time()[["elapsed"]]
  ci <- suppressWarnings(confint(fit, method = "profile", level = 0.95))
  out$profile[[nm]] <- list(elapsed_s = proc.time()[["elapsed"]] - t0, names = rownames(ci),
                            lower = unname(ci[, 1]), upper = unname(ci[, 2]), nAGQ = fit@devcomp$dims[["nAGQ"]],
                            theta = unname(getME(fit, "theta")), fixef = unname(fixef(fit)))
}
g0 <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, nAGQ = 0)
out$profile_glmm_nagq0 <- list(
  lme4_error = tryCatch({ suppressMessages(confint(g0, method = "profile")); "none" },
                        error = function(e) conditionMessage(e)))

# hat values, Cook's distance, rePCA
diag_fits <- list(
  dyestuff_REML = lme4::lmer(Yield ~ 1 + (1 | Batch), lme4::Dyestuff),
  sleep_slopes_REML = lme4::lmer(Reaction ~ Days + (Days | Subject), ss)
)
out$diagnostics <- lapply(diag_fits, function(fit) {
  pc <- rePCA(fit)
  list(hatvalues = unname(hatvalues(fit)), cooks = unname(cooks.distance(fit)),
       rePCA_sdev = lapply(pc, function(x) unname(x$sdev)))
})
out$versions <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                     lmerTest = as.character(packageVersion("lmerTest")),
                     pbkrtest = as.character(packageVersion("pbkrtest")))
dir.create("tests/reference", showWarnings = FALSE)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "tests/reference/inference_refs.json")
write.csv(cake, "stochmm/datasets/data/cake.csv", row.names = FALSE)
