-- A little data to look at: two users chatting in a room, one direct message, presence and an
-- activity feed. Idempotent (fixed ids).
insert into public.messages (id, room_id, sender_id, content, created_at) values
  (1, 'lobby', '11111111-1111-1111-1111-111111111111', 'welcome to the lobby!', now() - interval '5 minutes'),
  (2, 'lobby', '22222222-2222-2222-2222-222222222222', 'hi there', now() - interval '4 minutes')
on conflict (id) do nothing;
insert into public.messages (id, sender_id, recipient_id, content) values
  (3, '11111111-1111-1111-1111-111111111111', '22222222-2222-2222-2222-222222222222', 'party quest tonight?')
on conflict (id) do nothing;
select setval(pg_get_serial_sequence('public.messages', 'id'), greatest(3, (select max(id) from public.messages)));

insert into public.presence (user_id, status, device) values
  ('11111111-1111-1111-1111-111111111111', 'online', 'laptop'),
  ('22222222-2222-2222-2222-222222222222', 'away', 'phone')
on conflict (user_id) do nothing;

insert into public.activity_stream (id, user_id, kind, payload, is_public) values
  (1, '11111111-1111-1111-1111-111111111111', 'level_up', '{"level": 5}', true),
  (2, '22222222-2222-2222-2222-222222222222', 'achievement', '{"name": "first message"}', true),
  (3, '22222222-2222-2222-2222-222222222222', 'goal_completed', '{"goal": "daily run"}', false)
on conflict (id) do nothing;
select setval(pg_get_serial_sequence('public.activity_stream', 'id'), greatest(3, (select max(id) from public.activity_stream)));
