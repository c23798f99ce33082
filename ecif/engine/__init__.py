"""The ECIF engine: pure tensor math for the bilinear CLIP head, no I/O.

Imports only ``ecif.engine`` and ``ecif.grad`` (the shared CG, Newton loop, damped Cholesky);
never ``api``, ``data``, ``audit``, ``cli`` or ``app``. Every module, the fast paths of the
formulas it holds (docs/math.md), and the tests that pin them to their reference forms: an
independent autograd or brute-force computation in float64 (tests/engine_reference.py,
``ecif.grad.autodiff``). docs/math.md section 11 has the same map by formula.

batches: the recorded partition and chunked reads (iter_chunks, take_rows, CHUNK_ROWS);
    exercised by every test below.
contrastive: InfoNCE and the removal terms on batch logits S (c, B, B).
    loss_grad_logits, loss_hessian_logits: dL/dS and its Hessian-vector product;
    removal_weights, removal_grad_logits: Neg_n (stable log(1 - p)) and dR_n/dS;
    removal_directional: dR_n along dS, the one implementation (full, K directions at
    once, selected members). Pinned in tests/test_engine_contrastive.py:
        test_loss_gradient_and_hessian_of_logits_match_autograd
        test_removal_identity_exact_neg_equals_loss_drop
        test_removal_values_and_gradients_match_autograd
        test_exact_neg_is_stable_when_a_probability_rounds_to_one
        test_fast_scoring_path_equals_reference_terms
    and tests/test_engine_relative.py:
        test_many_directions_equal_one_at_a_time
        test_selected_members_equal_the_full_batch_terms
head: Head (theta = vec(M) [, log t]: flatten, unflatten) and HeadObjective: J, its
    gradient and exact Hessian-vector products streamed over chunks, the dense Hessian from
    its Kronecker blocks. Pinned in tests/test_engine_closed_forms.py:
        test_value_gradient_and_hvps_equal_autodiff_of_the_reference
    and tests/test_engine_influence.py:
        test_hvp_matches_dense_autograd_hessian
        test_cached_hessian_vector_products_equal_recomputed_ones
fit: damped Newton (dense Hessian) or whitened L-BFGS handing over to Newton-CG; the loop
    and its float32 step test are ecif.grad.newton. Pinned in tests/test_engine_influence.py:
        test_fit_reaches_a_stationary_point_of_the_reference_objective
    tests/test_engine_fit_convergence.py, and tests/test_engine_closed_forms.py:
        test_shared_newton_on_the_reference_objective_reaches_the_fitted_head
warmup: the streamed minibatch warm-up. tests/test_engine_fit_warmup.py (the cold optimum).
precondition: L-BFGS's whitened variables. tests/test_engine_fit_whiten.py (Newton's optimum).
inverse_hessian: H^-1 by dense Cholesky, CG (ecif.grad) on exact products preconditioned by
    EK-FAC, EK-FAC alone, or auto; the head's Newton-CG direction. Pinned in
    tests/test_engine_influence.py:
        test_cg_and_ekfac_solvers_against_exact
        test_ekfac_from_a_batch_sample_stays_close_and_cg_stays_exact
        test_auto_solver_picks_the_cheaper_method_and_scores_agree
influence: the one-pass scores (score_pass: removal_directional per chunk), query and
    per-pair gradients, the negative-term breakdown. Pinned in tests/test_engine_influence.py:
        test_score_equals_brute_force_formula
        test_negative_breakdown_sums_to_influence_neg
    and tests/test_engine_closed_forms.py:
        test_pair_gradients_equal_the_jacobian_of_the_reference_removal_terms
        test_query_gradients_equal_autodiff
relative: relative influence; ||H^-1 grad R_n|| exactly (low-rank gradient) or from K
    probes; the candidates' numerator (removal_directional at selected members, W at its
    numerical rank). Pinned in tests/test_engine_relative.py:
        test_exact_norms_equal_brute_force
        test_probe_norms_estimate_exact_norms
        test_low_rank_w_and_precomputed_norms_match_the_full_path
    and tests/test_engine_influence.py:
        test_self_and_relative_influence_equal_brute_force
batch_context: the per-pair batch context stored for trace-back; dR_n and EK-FAC norms from
    each pair's kept batch members, with a bound on the rest (section 5's formula on a
    compressed batch). Pinned to the batch pass in tests/test_engine_relative.py:
        test_context_dots_equal_the_batch_pass_and_respect_their_bound
        test_context_norms_equal_the_batch_pass_ekfac_norms_and_respect_their_bound
"""
